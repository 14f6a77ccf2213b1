"""The harness a user runs: ``python -m bench {run,ablate,train,tokenize,data,leaderboard}``."""
