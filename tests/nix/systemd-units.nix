# The text of systemd unit files as NixOS writes them for `systemd.services.<name>`
# (nixos/lib/systemd-lib.nix: unitConfig, serviceConfig and serviceToUnit; and the
# stage-2 default path), for the definitions the module makes. The systemd tier
# (tests/systemd) installs these files in its guest unchanged.
{ lib }:
let
  inherit (lib)
    concatMapStrings
    concatStrings
    concatStringsSep
    mapAttrsToList
    optionalAttrs
    optionalString
    ;

  # systemd-lib.nix's toOption and attrsToSection.
  toOption =
    x:
    if x == true then
      "true"
    else if x == false then
      "false"
    else
      toString x;
  attrsToSection =
    attrs:
    concatStrings (
      lib.concatLists (
        mapAttrsToList (
          name: value: map (x: "${name}=${toOption x}\n") (if builtins.isList value then value else [ value ])
        ) attrs
      )
    );
in
{
  /**
    `services`: config.systemd.services; `defaultPath`: the packages NixOS appends to
    every service's `path`; `globalEnvironment`: config.systemd.globalEnvironment.
    Returns { "<name>.service" = text; }.
  */
  render =
    {
      services,
      defaultPath,
      globalEnvironment ? { },
    }:
    lib.mapAttrs' (
      name: def:
      let
        listOf = key: def.${key} or [ ];
        unitConfig =
          optionalAttrs (listOf "requires" != [ ]) { Requires = toString (listOf "requires"); }
          // optionalAttrs (listOf "wants" != [ ]) { Wants = toString (listOf "wants"); }
          // optionalAttrs (listOf "upholds" != [ ]) { Upholds = toString (listOf "upholds"); }
          // optionalAttrs (listOf "after" != [ ]) { After = toString (listOf "after"); }
          // optionalAttrs (listOf "before" != [ ]) { Before = toString (listOf "before"); }
          // optionalAttrs (listOf "bindsTo" != [ ]) { BindsTo = toString (listOf "bindsTo"); }
          // optionalAttrs (listOf "partOf" != [ ]) { PartOf = toString (listOf "partOf"); }
          // optionalAttrs (listOf "conflicts" != [ ]) { Conflicts = toString (listOf "conflicts"); }
          // optionalAttrs ((def.description or "") != "") { Description = def.description; }
          // (def.unitConfig or { });
        path = (def.path or [ ]) ++ defaultPath;
        environment =
          globalEnvironment
          // {
            PATH = "${lib.makeBinPath path}:${lib.makeSearchPathOutput "bin" "sbin" path}";
          }
          // (def.environment or { });
        wantedBy = listOf "wantedBy";
        text =
          "[Unit]\n"
          + attrsToSection unitConfig
          + "\n[Service]\n"
          + concatMapStrings (
            n:
            optionalString (environment.${n} != null) "Environment=${builtins.toJSON "${n}=${environment.${n}}"}\n"
          ) (builtins.attrNames environment)
          + (
            if def.reloadIfChanged or false then
              "X-ReloadIfChanged=true\n"
            else if !(def.restartIfChanged or true) then
              "X-RestartIfChanged=false\n"
            else
              ""
          )
          + optionalString (!(def.stopIfChanged or true)) "X-StopIfChanged=false\n"
          + attrsToSection (def.serviceConfig or { })
          + optionalString (wantedBy != [ ]) "\n[Install]\nWantedBy=${concatStringsSep " " wantedBy}\n";
      in
      lib.nameValuePair "${name}.service" {
        inherit text wantedBy;
      }
    ) services;
}
