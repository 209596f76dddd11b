"""Django REST framework with format suffixes (`format_suffix_patterns`), as an API upstream
routes: "/api/admin.json" is the admin view, asked for JSON. Served by the standard
library's WSGI server."""

import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

import django
from django.conf import settings

settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__, SECRET_KEY="routing-test",
                   INSTALLED_APPS=["rest_framework"], MIDDLEWARE=[], APPEND_SLASH=False,
                   REST_FRAMEWORK={"UNAUTHENTICATED_USER": None})
django.setup()

from django.http import HttpResponse  # noqa: E402 - after settings
from django.urls import path, re_path  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from rest_framework.urlpatterns import format_suffix_patterns  # noqa: E402
from rest_framework.views import APIView  # noqa: E402


def area_view(area: str) -> type[APIView]:
    class Area(APIView):
        def get(self, request, tail="", format=None):  # noqa: A002 - DRF's keyword
            return HttpResponse(f"route={area}\n", content_type="text/plain")
        post = put = delete = get
    return Area


def not_found(request, tail=""):
    return HttpResponse(f"route=none saw={request.path}\n", status=404, content_type="text/plain")


areas = []
for area in ("admin", "secret", "ops", "public"):
    areas += [path(f"api/{area}", area_view(area).as_view()),
              path(f"api/{area}/", area_view(area).as_view()),
              path(f"api/{area}/<path:tail>", area_view(area).as_view())]
urlpatterns = format_suffix_patterns(areas) + [re_path(r"^(?P<tail>.*)$", not_found)]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


print("listening", flush=True)
make_server("127.0.0.1", int(sys.argv[1]), get_wsgi_application(), handler_class=QuietHandler).serve_forever()
