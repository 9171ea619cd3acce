"""mcptwist's tests. Hypothesis runs deterministically, with no deadline."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mcptwist",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("mcptwist")
