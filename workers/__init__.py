"""Long-running hbbus processes: the aggregator and the failover runner."""
