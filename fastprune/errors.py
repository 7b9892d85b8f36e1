"""Errors fastprune raises for user mistakes: the message names the problem."""


class FastpruneError(ValueError):
    """A problem with the user's input (model, plan, ratio, path); nothing was changed."""
