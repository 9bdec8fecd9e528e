"""The console logger of lmforge runs: Dagster's events, one line each, tracebacks only on request.

A user mistake (a missing directory, a bad step name) must read as one clear line, not as a stack
trace; ``lmforge run -v`` (or ``tracebacks: true``) brings the traces back for debugging.  The Dagster
UI's event log always keeps the full error.
"""

from __future__ import annotations

import logging
import sys

import dagster as dg


class _DropTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\nStack Trace:" in message:
            record.msg, record.args = message.split("\nStack Trace:")[0].rstrip(), ()
        return True


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, default_value="INFO", description="DEBUG shows every Dagster event."),
        "tracebacks": dg.Field(bool, default_value=False, description="Print stack traces of failures."),
    },
    description="Console logger: one line per event; stack traces only with tracebacks: true.",
)
def console(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.Logger("lmforge", level=init_context.logger_config["log_level"].upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    if not init_context.logger_config["tracebacks"]:
        handler.addFilter(_DropTracebacks())
    logger.addHandler(handler)
    return logger
