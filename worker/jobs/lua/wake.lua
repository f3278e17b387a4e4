-- Wake one idle consumer of the ready queue KEYS[1] (see _wake.lua): for a message enqueued by Dramatiq itself.
wake(KEYS[1])
