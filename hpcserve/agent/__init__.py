"""Node agent: one per node; starts and supervises the processes of its node from plan.json."""
