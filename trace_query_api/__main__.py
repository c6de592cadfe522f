"""`python -m trace_query_api`: serve the query service with uvicorn (settings: TRACE_QUERY_*)."""

from __future__ import annotations

import logging

import uvicorn

from trace_query_api.secure import InsecureSettingsError, refuse_insecure_settings
from trace_resources.settings import get_query_settings


def main() -> None:
    settings = get_query_settings()
    try:
        refuse_insecure_settings(settings)  # here too: uvicorn would restart failing workers
    except InsecureSettingsError as exc:
        raise SystemExit(f"trace_query_api does not start: {exc}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        "trace_query_api.app:app",
        factory=True,
        host=settings.query_host,
        port=settings.query_port,
        workers=settings.query_workers,
        access_log=False,
        server_header=False,  # no `server: uvicorn` banner
        log_level="info",
    )


if __name__ == "__main__":
    main()
