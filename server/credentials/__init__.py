"""MQTT credentials of devices and service processes: issued, hashed, checked."""
