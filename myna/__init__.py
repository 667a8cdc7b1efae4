"""Myna: a social network's own assistant, search and ads, trained on its posts."""
