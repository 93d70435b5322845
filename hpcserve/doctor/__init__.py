"""`hpcserve doctor`: checks on every node of a job that would otherwise waste the allocation (checks.py, a
small registry), run by `hpcserve doctor RECIPE` through srun and by the node agent before anything starts."""
