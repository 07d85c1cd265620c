"""Worker scripts run as agents in the task tests (spawned with a node's env)."""
