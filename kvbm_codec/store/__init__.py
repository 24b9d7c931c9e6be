"""Where compressed frames live: capacity-bounded tiers (host memory, disk) behind one interface."""
