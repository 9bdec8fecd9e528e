"""Asset checks: the gates between stages.  Blocking checks stop everything downstream on failure."""
