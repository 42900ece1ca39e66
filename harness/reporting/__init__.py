"""Reporting: leaderboard tables, the statistics behind them and the HTML report."""
