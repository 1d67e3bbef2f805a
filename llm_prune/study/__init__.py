"""Studies of pruned models: where quality breaks (knee), how masks agree (similarity), figures (plots).

Submodules are imported explicitly (``from llm_prune.study.knee import find_knee``) so that
importing the package costs nothing; matplotlib is imported only inside ``plots`` functions.
"""
