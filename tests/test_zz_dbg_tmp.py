import os
from huggingface_hub import hf_hub_download, snapshot_download, HfApi, whoami
from conftest_hub import hub
def test_x(hub, tmp_path):
    api = hub.api
    print(api.whoami()["name"], whoami()["name"])
