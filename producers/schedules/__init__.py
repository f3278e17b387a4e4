"""The parts of the cron scheduler (``difyq.producers.scheduler``): when a cron fires, who may fire, what was fired."""
