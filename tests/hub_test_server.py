"""A test double of the Hugging Face Hub's upload routes, for tests on 127.0.0.1 only.

It is not a Hub implementation: it answers just what ``huggingface_hub`` (with ``HF_HUB_DISABLE_XET=1``) sends for
``create_repo``, ``create_branch`` and ``upload_folder``, and stores each commit in a plain git repository under
``<mirrors>/models/<org>/<name>/``. That is the layout ``olah`` serves in offline mode, so a test uploads here and
downloads the result through olah, a real third-party server, with the real client.

Routes:
    GET  /api/agent-harnesses                             the shape huggingface_hub 2.x caches in HF_HOME
    POST /api/repos/create                                409 if the repo exists
    POST /api/models/<repo>/branch/<branch>               409 if the branch exists
    POST /api/validate-yaml                               accepts any model card metadata
    GET  /api/models/<repo>/revision/<rev>                minimal model info
    HEAD /<repo>/resolve/<rev>/<path>                     200 or 404, as file_exists() asks
    POST /api/models/<repo>/preupload/<rev>               *.safetensors and files over 1 MB go through LFS
    POST /<repo>.git/info/lfs/objects/batch               LFS basic transfer: one PUT per object
    PUT  /lfs/<oid>                                       checks the sha256 of the body
    POST /api/models/<repo>/commit/<rev>                  NDJSON header / file / lfsFile lines
Every POST needs an ``Authorization: Bearer`` header, as on the Hub; the LFS ``PUT`` URL stands for the Hub's
pre-signed storage URL and needs none.
"""
import base64
import hashlib
import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

LFS_THRESHOLD = 1 << 20
GIT = ['git', '-c', 'user.name=hub-test-server', '-c', 'user.email=hub-test-server@localhost', '-c',
       'init.defaultBranch=main', '-c', 'commit.gpgsign=false']


def _git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


class HubTestServer:
    """Serve the upload routes on ``127.0.0.1:<port>`` in a background thread; ``stop()`` shuts it down.

    Args:
        mirrors: olah's ``mirrors-path``; repos are created under ``mirrors/models``.
    """

    def __init__(self, mirrors: Path):
        self.models = Path(mirrors) / 'models'
        self.lfs = Path(mirrors).parent / 'lfs-objects'
        self.models.mkdir(parents=True, exist_ok=True)
        self.lfs.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # git repos are not safe for concurrent commits
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), _handler(self))
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> 'HubTestServer':
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def repo_path(self, repo_id: str) -> Path:
        return self.models / repo_id

    def create_repo(self, repo_id: str) -> bool:
        path = self.repo_path(repo_id)
        if path.exists():
            return False
        path.mkdir(parents=True)
        _git(path, 'init', '-q')
        (path / '.gitattributes').write_text('*.safetensors filter=lfs diff=lfs merge=lfs -text\n')
        _git(path, 'add', '.gitattributes')
        _git(path, 'commit', '-q', '-m', 'initial commit')
        return True

    def create_branch(self, repo_id: str, branch: str) -> bool:
        path = self.repo_path(repo_id)
        if _git(path, 'branch', '--list', branch):
            return False
        _git(path, 'branch', branch, 'main')
        return True

    def commit(self, repo_id: str, revision: str, lines: list) -> str:
        path = self.repo_path(repo_id)
        _git(path, 'checkout', '-q', revision)
        try:
            summary = 'upload'
            for line in lines:
                key, value = line['key'], line['value']
                if key == 'header':
                    summary = value.get('summary') or summary
                elif key == 'file':
                    self._write(path, value['path'], base64.b64decode(value['content']))
                elif key == 'lfsFile':
                    self._write(path, value['path'], (self.lfs / value['oid']).read_bytes())
                elif key == 'deletedFile':
                    (path / value['path']).unlink(missing_ok=True)
            _git(path, 'add', '-A')
            _git(path, 'commit', '-q', '--allow-empty', '-m', summary)
            return _git(path, 'rev-parse', 'HEAD')
        finally:
            _git(path, 'checkout', '-q', 'main')

    @staticmethod
    def _write(repo: Path, name: str, data: bytes) -> None:
        target = (repo / name).resolve()
        if repo.resolve() not in target.parents:
            raise ValueError(f'path outside the repo: {name}')
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _handler(server: HubTestServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, body: Optional[dict[str, Any]] = None,
                   headers: Optional[dict[str, str]] = None) -> None:
            data = json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            if self.command != 'HEAD':
                self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get('Content-Length', 0)))

        def _authorized(self) -> bool:
            if self.headers.get('Authorization', '').startswith('Bearer '):
                return True
            self._reply(401, {'error': 'Invalid credentials in Authorization header'})
            return False

        def _route(self, pattern: str) -> Optional[tuple[str, ...]]:
            match = re.fullmatch(pattern, self.path.split('?')[0])
            return tuple(unquote(g) for g in match.groups()) if match else None

        def do_GET(self) -> None:
            if self.path.startswith('/api/agent-harnesses'):
                return self._reply(200, {'standardEnvVars': [], 'harnesses': {}})
            found = self._route(r'/api/models/([^/]+/[^/]+)/revision/([^/]+)')
            if found and server.repo_path(found[0]).is_dir():
                repo = server.repo_path(found[0])
                with server.lock:
                    sha = _git(repo, 'rev-parse', found[1])
                    files = _git(repo, 'ls-tree', '-r', '--name-only', found[1]).splitlines()
                return self._reply(200, {'id': found[0], 'modelId': found[0], 'sha': sha, 'private': False,
                                         'siblings': [{'rfilename': f} for f in files]})
            found = self._route(r'/([^/]+/[^/]+)/resolve/([^/]+)/(.+)')
            if found and server.repo_path(found[0]).is_dir():
                with server.lock:
                    files = subprocess.run([*GIT, 'ls-tree', '-r', '--name-only', found[1]], cwd=server.repo_path(
                        found[0]), capture_output=True, text=True).stdout.splitlines()
                if found[2] in files:
                    return self._reply(200)
                return self._reply(404, {'error': 'Entry not found'}, {'X-Error-Code': 'EntryNotFound'})
            self._reply(404, {'error': 'Repository not found'}, {'X-Error-Code': 'RepoNotFound'})

        do_HEAD = do_GET

        def do_PUT(self) -> None:
            found = self._route(r'/lfs/([0-9a-f]{64})')
            data = self._body()
            if not found:
                return self._reply(404)
            if hashlib.sha256(data).hexdigest() != found[0]:
                return self._reply(400, {'error': 'sha256 of the body does not match the oid'})
            (server.lfs / found[0]).write_bytes(data)
            self._reply(200)

        def do_POST(self) -> None:
            body = self._body()
            if not self._authorized():
                return None
            if self.path == '/api/validate-yaml':
                return self._reply(200, {'errors': [], 'warnings': []})
            if self.path == '/api/repos/create':
                request = json.loads(body)
                repo_id = f'{request["organization"]}/{request["name"]}' if request.get('organization') \
                    else request['name']
                with server.lock:
                    created = server.create_repo(repo_id)
                url = f'{server.url}/{repo_id}'
                if not created:
                    return self._reply(409, {'error': 'You already created this model repo', 'url': url},
                                       {'X-Error-Code': 'RepoExists'})
                return self._reply(200, {'url': url, 'name': repo_id})
            found = self._route(r'/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/([^/]+)')
            if found and not server.repo_path(found[0]).is_dir():
                return self._reply(404, {'error': 'Repository not found'})
            if found and found[1] == 'branch':
                with server.lock:
                    created = server.create_branch(found[0], found[2])
                return self._reply(200 if created else 409, {} if created else {'error': 'Reference already exists'})
            if found and found[1] == 'preupload':
                files = json.loads(body)['files']
                modes = [{'path': f['path'], 'shouldIgnore': False,
                          'uploadMode': 'lfs' if f['path'].endswith('.safetensors') or f['size'] > LFS_THRESHOLD
                          else 'regular'} for f in files]
                return self._reply(200, {'files': modes, 'commitOid': None})
            if found and found[1] == 'commit':
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                with server.lock:
                    oid = server.commit(found[0], found[2], lines)
                return self._reply(200, {'commitUrl': f'{server.url}/{found[0]}/commit/{oid}', 'commitOid': oid,
                                         'pullRequestUrl': None})
            found = self._route(r'/([^/]+/[^/]+)\.git/info/lfs/objects/batch')
            if found:
                objects = json.loads(body)['objects']
                return self._reply(200, {'transfer': 'basic', 'objects': [
                    {'oid': o['oid'], 'size': o['size'], 'authenticated': True,
                     'actions': {'upload': {'href': f'{server.url}/lfs/{o["oid"]}', 'header': {}}}}
                    for o in objects]})
            self._reply(404, {'error': 'not a route of this test double'})

    return Handler
