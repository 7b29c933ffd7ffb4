"""The stack that serves the night: the Prefect server and its database, the confined worker and engine, the
watchdog, the local and HA topologies. It imports the night to deploy and run it; the night never imports it."""
