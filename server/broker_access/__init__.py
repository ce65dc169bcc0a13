"""Who may connect to the MQTT broker and what each identity may do there:
the rules (pure), the credential check behind every broker we support, and
the mirror that copies credentials into brokers that keep their own list."""
