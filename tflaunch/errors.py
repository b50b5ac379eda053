"""Exceptions raised by tflaunch.

Every error a user can cause carries a message that says what is wrong and what to do; the CLI prints
it as one line and exits with :attr:`TflaunchError.exit_code`.
"""
from __future__ import annotations


class TflaunchError(Exception):
    """Base class of every error tflaunch raises on purpose."""

    exit_code = 1


class SpecError(TflaunchError, ValueError):
    """A job specification (estimator field, CLI option) is invalid; the message names the field."""

    exit_code = 2


class SnapshotError(TflaunchError):
    """The source directory cannot be snapshotted (missing, over the limits, entry script absent)."""

    exit_code = 2


class StoreError(TflaunchError):
    """The run store (``TFLAUNCH_HOME``) cannot be read or written."""


class RunNotFoundError(StoreError, LookupError):
    """No run matches the given id (or the prefix is ambiguous)."""

    exit_code = 2


class RunDeletedError(RunNotFoundError):
    """The run was deleted: it is in the home's trash (``tflaunch runs restore`` brings it back)."""


class RunActiveError(TflaunchError):
    """The run has not ended, so it cannot be deleted (cancel it first, or delete with ``cancel=True``)."""

    exit_code = 2


class ModelNotFoundError(StoreError, LookupError):
    """No registered model has the given name (or version)."""

    exit_code = 2


class ExportError(TflaunchError):
    """A model could not be exported to ONNX: conversion failed, the check against TensorFlow failed, or the
    interpreter lacks TensorFlow/tf2onnx/onnxruntime."""


class EnvBuildError(TflaunchError):
    """A job environment could not be built (a package missing from the wheelhouse, disk full, a tool that
    failed or was killed); the message names the cause. Nothing half-built is left where a run would use it."""


class EnvBusyError(EnvBuildError):
    """An environment cannot be removed while a build of it holds its lock."""


class EnvNotFoundError(TflaunchError, LookupError):
    """No job environment matches the given key (or the prefix is ambiguous)."""

    exit_code = 2


class PathSafetyError(TflaunchError):
    """A requested path escapes the run record (``..``, absolute path, symlink out of the run)."""

    exit_code = 2


class RunFailedError(TflaunchError):
    """Raised by :meth:`tflaunch.Run.wait_for_completion` when the run ended Failed."""

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}
