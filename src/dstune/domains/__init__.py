"""Domains as plugins: each module registers a data source with its options, its metrics and its verifiers.

dstune ships one, the ICD-10-CM demo (icd10.py). The registries import these modules (dstune.plugins.DOMAINS) on
their first look-up; no other dstune code imports them. A package adds a domain the same way, through the
`dstune.sources`, `dstune.metrics` and `dstune.verifiers` entry point groups.
"""
