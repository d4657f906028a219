"""The closed loop: simulated and real traffic, the gateways, the evaluation, its report and ``make demo``."""
