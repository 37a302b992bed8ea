"""HTTP routes of the service, one module per resource (see service.app for the wiring)."""
