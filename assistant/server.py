"""The composition root: serve the API and the page from one process.

`create_app(services)` returns the FastAPI app with the API routes and (when the `ui` package is
importable) the Gradio page mounted at `/`; `serve(settings)` builds the services
(`assistant.services.build_services`) and runs it.
"""

from __future__ import annotations

import logging
import threading

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from assistant.actions.library import Library
from assistant.actions.personal import PersonalActions
from assistant.actions.users import UserAdmin
from assistant.admin_api import install_admin
from assistant.api import create_api
from assistant.config import Settings
from assistant.library_api import install_library
from assistant.personal_api import install_personal
from assistant.services import OFFLINE_ENV, Services, attach_agent, build_services, quiet_network
from assistant.users_api import install_users

# Re-exported: callers start servers with these.
__all__ = ["OFFLINE_ENV", "Services", "attach_agent", "build_services", "create_app", "quiet_network", "serve"]
log = logging.getLogger("assistant")

def create_app(services: Services, with_ui: bool = True) -> FastAPI:
    # No Swagger/ReDoc pages: they load scripts from a CDN. The schema stays at /openapi.json.
    app = FastAPI(title="Self-improving assistant", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.services = services
    # Our own CORS policy: no origin but the page's own unless configured, and never with credentials.
    # Gradio adds none of its own (it allowed credentialed requests from any localhost origin) when the
    # host app has one.
    app.add_middleware(CORSMiddleware, allow_origins=services.settings.cors_origins, allow_credentials=False,
                       allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"], allow_headers=["Authorization",
                                                                                           "Content-Type"])
    create_api(app, services.store, services.chat)
    install_admin(app, services)  # /v1/admin/...: the retraining loop's admin actions
    knowledge = services.knowledge
    install_library(app, Library(services.settings, services.store, knowledge, services.memories))
    install_users(app, UserAdmin(services.settings, services.store, knowledge))  # /v1/admin/users, /v1/admin/audit
    install_personal(app, PersonalActions(services))  # /v1/personal, /v1/admin/personal
    if with_ui:
        from ui.gradio_import import skip_stub_writing

        skip_stub_writing()  # 2.7 s of gradio's import writes editor stubs (ui/gradio_import.py)
        from ui.app import mount_ui  # gradio is heavy: imported only when the UI is wanted

        app = mount_ui(app, services)
    return app


def serve(settings: Settings) -> None:
    import uvicorn

    from training.scheduler import start_loop

    services = build_services(settings)
    app = create_app(services)
    # Recover jobs a crash left running, load the recorded serving adapter, start the (opt-in) scheduler.
    start_loop(services)
    # The embedder, the lexical index and the model's kernels load beside start-up.
    threading.Thread(target=services.warm_up, name="warm-up", daemon=True).start()
    log.warning("serving on http://%s:%d", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
