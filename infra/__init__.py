"""How the system is stood up: configuration, the Mosquitto broker, Prometheus, the CLI."""
