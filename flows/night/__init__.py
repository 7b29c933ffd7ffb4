"""The night: what one run of the pipeline does and decides (the flow, its steps and parameters, caching, result
records, alerts, recovery, the summary). Nothing here starts a process or knows how the stack serves it."""
