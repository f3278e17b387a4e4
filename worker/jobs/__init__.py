"""Jobs: the resource model, its Redis store and the Dramatiq messages that carry job ids."""
