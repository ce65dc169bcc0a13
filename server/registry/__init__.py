"""The device registry: devices and sites."""
