"""Manifest rows that csv would read without complaint but that lose or mangle data."""

from mol_tune.data.manifest import iter_items


def write(tmp_path, text):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return str(path)


def test_unclosed_quote_is_an_error(tmp_path):
    rows = ["image,caption", "a.png,a seven", 'b.png,"an unclosed caption'] + [f"c{i}.png,row {i}" for i in range(5)]
    items = list(iter_items(write(tmp_path, "\n".join(rows) + "\n"), ["image", "caption"]))
    assert items[0].error is None
    assert items[1].error is not None
    assert "runs over lines 3 to" in str(items[1].error)


def test_extra_field_is_an_error(tmp_path):
    items = list(iter_items(write(tmp_path, "image,caption\na.png,a seven,extra\n"), ["image", "caption"]))
    assert "1 more fields than the header" in str(items[0].error)


def test_missing_field_lists_present_ones(tmp_path):
    items = list(iter_items(write(tmp_path, "image,caption\na.png\n"), ["image", "caption"]))
    message = str(items[0].error)
    assert "fields ['caption'] are missing; the row has ['image']" in message


def test_good_rows_pass(tmp_path):
    items = list(iter_items(write(tmp_path, "image,caption\na.png,a seven\nb.png,\"a two, in quotes\"\n"), ["image", "caption"]))
    assert [i.error for i in items] == [None, None]
    assert items[1].fields["caption"] == "a two, in quotes"
