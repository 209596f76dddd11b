# Just enough of nixpkgs' `lib` to evaluate nixos/options.nix without a nixpkgs
# checkout (the CI machines have only Debian's Nix 2.8): every option becomes a plain
# attrset with its default, description and type description. Type descriptions follow
# nixpkgs' wording and parenthesisation (lib/types.nix), so that the options table in
# the NixOS options table of docs/options.md reads as the NixOS manual would; test_module_lib.py compares them with
# the real `lib` where one is available.
let
  # A type's description is `describe show`, where `show` renders the literal values in it
  # (patterns, enum values): `describe (s: s)` is nixpkgs' wording, and options-eval.nix
  # renders them as Markdown code for the docs table.
  type =
    describe: descriptionClass: extra:
    {
      description = describe (s: s);
      inherit describe descriptionClass;
    }
    // extra;
  fixed = text: _show: text;
  # lib.types.optionDescriptionPhrase
  phrase =
    unparenthesize: show: t:
    if unparenthesize (t.descriptionClass or null) then t.describe show else "(${t.describe show})";
  nounOrConjunction = class: class == "noun" || class == "conjunction";
in
{
  mkOption = args: args // { _isOption = true; };

  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  types = {
    str = type (fixed "string") "noun" { };
    bool = type (fixed "boolean") "noun" { };
    port = type (fixed "16 bit unsigned integer; between 0 and 65535 (both inclusive)") "noun" { };
    package = type (fixed "package") "noun" { };
    path = type (fixed "absolute path") "noun" { };
    externalPath = type (fixed "absolute path not in the Nix store") "noun" { };
    numbers.nonnegative =
      type (fixed "nonnegative integer or floating point number, meaning >=0") "nonRestrictiveClause"
        { };
    nullOr =
      t:
      type (show: "null or ${phrase nounOrConjunction show t}") "conjunction" (
        if t ? options then { inherit (t) options; } else { }
      );
    listOf =
      t: type (show: "list of ${phrase (class: class == "noun" || class == "composite") show t}") "composite" { };
    attrsOf =
      t:
      type (show: "attribute set of ${phrase (class: class == "noun" || class == "composite") show t}") "composite"
        { };
    either =
      a: b:
      type (
        show:
        if a.descriptionClass == "nonRestrictiveClause" then
          "${a.describe show}, or ${phrase nounOrConjunction show b}"
        else
          "${phrase nounOrConjunction show a} or ${
            phrase (class: nounOrConjunction class || class == "composite") show b
          }"
      ) "conjunction" { };
    enum =
      values:
      type (show: "one of ${builtins.concatStringsSep ", " (map (v: show (builtins.toJSON v)) values)}") (
        if builtins.length values < 2 then "noun" else "conjunction"
      ) { };
    strMatching = pattern: type (show: "string matching the pattern ${show pattern}") "noun" { inherit pattern; };
    submodule = module: type (fixed "submodule") null { inherit (module) options; };
  };
}
