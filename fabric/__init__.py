"""agent-fabric: a NATS-native fabric that runs and watches processes on many hosts."""

__version__ = "0.1.0"
