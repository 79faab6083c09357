"""Job glue: what a workflow job needs around the science (logging, threads, device, model loading, GPU leases)."""
