# Just enough of nixpkgs' `lib` to evaluate nixos/options.nix without a nixpkgs
# checkout (the CI machines have only Debian's Nix 2.8): every option becomes a plain
# attrset with its default, description and a readable type. The real `lib` is used by
# test_module_lib.py where one is available.
let
  type = description: extra: { inherit description; } // extra;
  describe = t: t.description;
in
{
  mkOption = args: args // { _isOption = true; };

  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  types = {
    str = type "string" { };
    bool = type "boolean" { };
    port = type "16 bit unsigned integer; between 0 and 65535 (both inclusive)" { };
    package = type "package" { };
    path = type "absolute path" { };
    externalPath = type "absolute path not in the Nix store" { };
    numbers.nonnegative = type "non-negative integer or floating point number" { };
    nullOr = t: type "null or ${describe t}" (if t ? options then { inherit (t) options; } else { });
    listOf = t: type "list of ${describe t}" { };
    attrsOf = t: type "attribute set of ${describe t}" { };
    either = a: b: type "${describe a} or ${describe b}" { };
    enum = values: type "one of ${builtins.concatStringsSep ", " (map builtins.toJSON values)}" { };
    strMatching = pattern: type "string matching the pattern ${pattern}" { inherit pattern; };
    submodule = module: type "submodule" { options = module.options; };
  };
}
