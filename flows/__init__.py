"""Prefect flows, deployments and the ``slimflow`` CLI.

Importing this package changes nothing: the CLI applies Prefect's project settings
(:mod:`flows.prefect_settings`) before it imports Prefect.
"""
