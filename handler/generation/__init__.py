"""The static-batch generator: slots, token selection, detokenization, the scheduler thread."""
