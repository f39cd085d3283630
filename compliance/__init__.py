"""Imaging compliance gateway: RBAC, encryption at rest, de-identification and ATNA audit for DICOMweb."""

__version__ = "0.1.0"
