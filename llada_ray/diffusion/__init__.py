"""The LLaDA2 math in pure torch: noise, attention masks, losses, WSD schedule. No Ray, no I/O."""
