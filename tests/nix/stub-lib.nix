# Just enough of nixpkgs' `lib` to evaluate nixos/options.nix without a nixpkgs
# checkout (the CI machines have only Debian's Nix 2.8): every option becomes a plain
# attrset with its default, description and type description. Type descriptions follow
# nixpkgs' wording and parenthesisation (lib/types.nix), so that the options table in
# the NixOS options table of docs/options.md reads as the NixOS manual would; test_module_lib.py compares them with
# the real `lib` where one is available.
let
  type = description: descriptionClass: extra: { inherit description descriptionClass; } // extra;
  # lib.types.optionDescriptionPhrase
  phrase =
    unparenthesize: t:
    if unparenthesize (t.descriptionClass or null) then t.description else "(${t.description})";
  nounOrConjunction = class: class == "noun" || class == "conjunction";
in
{
  mkOption = args: args // { _isOption = true; };

  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  types = {
    str = type "string" "noun" { };
    bool = type "boolean" "noun" { };
    port = type "16 bit unsigned integer; between 0 and 65535 (both inclusive)" "noun" { };
    package = type "package" "noun" { };
    path = type "absolute path" "noun" { };
    externalPath = type "absolute path not in the Nix store" "noun" { };
    numbers.nonnegative =
      type "nonnegative integer or floating point number, meaning >=0" "nonRestrictiveClause"
        { };
    nullOr =
      t:
      type "null or ${phrase nounOrConjunction t}" "conjunction" (
        if t ? options then { inherit (t) options; } else { }
      );
    listOf =
      t: type "list of ${phrase (class: class == "noun" || class == "composite") t}" "composite" { };
    attrsOf =
      t: type "attribute set of ${phrase (class: class == "noun" || class == "composite") t}" "composite" { };
    either =
      a: b:
      type (
        if a.descriptionClass == "nonRestrictiveClause" then
          "${a.description}, or ${phrase nounOrConjunction b}"
        else
          "${phrase nounOrConjunction a} or ${
            phrase (class: nounOrConjunction class || class == "composite") b
          }"
      ) "conjunction" { };
    enum =
      values:
      type "one of ${builtins.concatStringsSep ", " (map builtins.toJSON values)}" (
        if builtins.length values < 2 then "noun" else "conjunction"
      ) { };
    strMatching = pattern: type "string matching the pattern ${pattern}" "noun" { inherit pattern; };
    submodule = module: type "submodule" null { inherit (module) options; };
  };
}
