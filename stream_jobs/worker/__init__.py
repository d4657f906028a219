"""The live worker: the Faust app, its agents and web views, Faust tuning, event-time order, ``stormguard run``."""
