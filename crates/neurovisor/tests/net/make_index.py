"""Writes a PEP 503 simple index with one wheel, built here by hand (a wheel
is a zip with a dist-info directory): <root>/simple/... and <root>/packages/."""
import base64
import hashlib
import os
import sys
import zipfile

root = sys.argv[1]
name, version = "nvtestpkg", "1.0"
wheel = f"{name}-{version}-py3-none-any.whl"
os.makedirs(f"{root}/packages", exist_ok=True)
os.makedirs(f"{root}/simple/{name}", exist_ok=True)
files = {
    f"{name}/__init__.py": "def answer():\n    return 42\n",
    f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: neurovisor-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for path, text in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    record.append(f"{path},sha256={digest},{len(text.encode())}")
record.append(f"{name}-{version}.dist-info/RECORD,,")
files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
with zipfile.ZipFile(f"{root}/packages/{wheel}", "w") as z:
    for path, text in files.items():
        z.writestr(path, text)
sha = hashlib.sha256(open(f"{root}/packages/{wheel}", "rb").read()).hexdigest()
with open(f"{root}/simple/index.html", "w") as f:
    f.write(f'<html><body><a href="{name}/">{name}</a></body></html>\n')
with open(f"{root}/simple/{name}/index.html", "w") as f:
    f.write(f'<html><body><a href="../../packages/{wheel}#sha256={sha}">{wheel}</a></body></html>\n')
