"""Training: the schedules (learning rate, KL warm-up, free bits; ``schedules``), one
optimisation step (``stepper``), the loop around it (``trainer``), the sums across processes
under torchrun (``distributed``), and starting, resuming and loading runs (``runs``).
"""
