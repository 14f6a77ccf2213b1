"""The harness a user runs: ``python -m bench {run,train,data,leaderboard}``."""
