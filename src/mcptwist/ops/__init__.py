"""What operators see: the audit trail, the Prometheus metrics and the reports
to systemd. They record what the core and the web tell them."""
