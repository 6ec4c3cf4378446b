import pytest

from bmcell.taxonomy import (
    DEFAULT_TAXONOMY,
    Taxonomy,
    TaxonomyError,
    check_additive,
    parse_taxonomy,
)


def test_example_file_loads():
    tax = Taxonomy.load("docs/examples/taxonomy-3class.yaml")
    assert tax.codes == ["LY", "NE", "ART"]
    assert tax.classes[0].key == "l" and tax.classes[0].description
    assert Taxonomy.from_json(tax.to_json()) == tax


def test_default_unchanged():
    assert DEFAULT_TAXONOMY.num_classes == 17 and len(DEFAULT_TAXONOMY.eval_codes) == 16


def test_error_names_line_and_field():
    text = "name: x\nclasses:\n  - {code: A, name: a}\n  - {code: A, name: b}\n"
    with pytest.raises(TaxonomyError) as e:
        parse_taxonomy(text, fmt="yaml")
    assert e.value.field == "classes[1].code" and e.value.line == 4


def test_json_syntax_error_line():
    with pytest.raises(TaxonomyError) as e:
        parse_taxonomy('{"name": "x",\n "classes": [,]}')
    assert e.value.line == 2


def test_add_only():
    old = Taxonomy.load("docs/examples/taxonomy-3class.yaml")
    grown = Taxonomy.from_json(
        old.to_json() | {"classes": old.to_json()["classes"] + [{"code": "MO", "name": "monocyte"}]}
    )
    check_additive(old, grown)
    swapped = Taxonomy.from_json(old.to_json() | {"classes": old.to_json()["classes"][::-1]})
    with pytest.raises(TaxonomyError):
        check_additive(old, swapped)
