"""Experimentation, independent of any model.

A/B analysis from the lake, off-policy evaluation, and a list-serving simulator that validates
both against a synthetic world's hidden truth.
"""
