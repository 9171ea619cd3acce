"""Who may reach the bridge, and how often: Origin and Host rules, IP filters,
TLS, credentials (tokens and JWTs) and rate limits."""
