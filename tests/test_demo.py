import re

from pristine.cli import main


def test_demo_writes_a_page_whose_images_exist(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all((out / s).is_file() for s in sources)
    assert "a big red star on the left, on grass" in page
    from PIL import Image

    grid = Image.open(out / "samples.png")
    assert grid.size[0] > 4 * 32 * 4 and grid.size[1] > 8 * 32 * 4  # 8 prompts x 4 seeds, enlarged
    assert not list(out.glob("*.tmp*"))
