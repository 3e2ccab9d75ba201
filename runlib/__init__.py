"""The machinery under the speedrun's scripts: errors, devices and processes, checkpoint files, run names and locks,
stopping at signals, the run log, and the command line of a settings dataclass.

Imports go one way: the entry scripts (train_gpt.py, train_gpt_medium.py, generate.py, eval_hellaswag.py,
records/report.py, bench/) import this package, which imports data/shards.py and nothing of theirs. Its functions
take numbers, paths and dicts (a settings dataclass only as a type to make flags of), never the trainer's objects:
when to validate, save or stop is the training loop's to say, how it is done is said here. Importing any module of
it has no side effects.
"""
