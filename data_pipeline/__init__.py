"""Curation pipeline on datatrove. Importing the package does not import datatrove."""
