"""Create a Grafana service-account token for Stormguard's annotation sink (docker-compose.yml).

Runs once before the workers start: logs in as the admin (GF_ADMIN_USER /
GF_ADMIN_PASSWORD), makes or finds the service account "stormguard" (Editor),
issues a fresh token and writes it to TOKEN_FILE, which the workers read as
GRAFANA_TOKEN_FILE. Standard library only.
"""

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

URL = os.environ.get("GRAFANA_URL", "http://grafana:3000").rstrip("/")
USER = os.environ.get("GF_ADMIN_USER", "admin")
PASSWORD = os.environ.get("GF_ADMIN_PASSWORD", "stormguard")
TOKEN_FILE = os.environ.get("TOKEN_FILE", "/secrets/grafana-token")
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def call(method, path, body=None):
    req = urllib.request.Request(URL + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": AUTH, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def main():
    for _ in range(120):
        try:
            call("GET", "/api/health")
            break
        except (OSError, urllib.error.URLError):
            time.sleep(1)
    found = call("GET", "/api/serviceaccounts/search?query=stormguard").get("serviceAccounts", [])
    account = next((a for a in found if a.get("name") == "stormguard"), None)
    if account is None:
        account = call("POST", "/api/serviceaccounts", {"name": "stormguard", "role": "Editor"})
    token = call("POST", f"/api/serviceaccounts/{account['id']}/tokens", {"name": f"stormguard-{int(time.time())}"})
    os.makedirs(os.path.dirname(TOKEN_FILE), exist_ok=True)
    with open(TOKEN_FILE, "w") as fh:
        fh.write(token["key"])
    print(f"make_token: wrote a token for service account 'stormguard' to {TOKEN_FILE}")


if __name__ == "__main__":
    sys.exit(main())
