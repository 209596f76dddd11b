// An upstream that believes only what it can verify: tsnsrv's signed identity assertion,
// checked with go-jose (github.com/go-jose/go-jose/v4) against the service's published
// keys (JWKS).
//
//	verifier PORT JWKS_FILE AUDIENCE ISSUER [bound]
//
// Answers 200 with the identity it verified (and the assertion and its key id, so that
// tests can replay it), or 401 with why it refused. Whatever identity headers a request
// carries are ignored. The `verify` function is the Go example of
// docs/identity-assertions.md (tests/unit/test_docs.py keeps the two the same).
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

var (
	jwksFile, audience, issuer = os.Args[2], os.Args[3], os.Args[4]
	bound                      = len(os.Args) > 5 && os.Args[5] == "bound"
)

// docs:begin
// Identity is what tsnsrv asserts beyond the registered claims (sub, iat, exp, ...).
type Identity struct {
	Login  string   `json:"login"`
	Name   string   `json:"name"`
	Node   string   `json:"node"`
	NodeID string   `json:"node_id"`
	Tags   []string `json:"tags"`
	Htm    string   `json:"htm"`
	Htu    string   `json:"htu"`
}

// verify returns the identity tsnsrv vouches for, or an error.
func verify(assertion, method, target string) (*jwt.Claims, *Identity, error) {
	data, err := os.ReadFile(jwksFile) // read anew: keys rotate
	if err != nil {
		return nil, nil, err
	}
	var keys jose.JSONWebKeySet
	if err := json.Unmarshal(data, &keys); err != nil {
		return nil, nil, err
	}
	token, err := jwt.ParseSigned(assertion, []jose.SignatureAlgorithm{jose.EdDSA})
	if err != nil {
		return nil, nil, err
	}
	found := keys.Key(token.Headers[0].KeyID)
	if len(found) != 1 {
		return nil, nil, errors.New("signed with a key this service does not publish")
	}
	var claims jwt.Claims
	var identity Identity
	if err := token.Claims(found[0].Key, &claims, &identity); err != nil {
		return nil, nil, err
	}
	expected := jwt.Expected{Issuer: issuer, AnyAudience: jwt.Audience{audience}, Time: time.Now()}
	if err := claims.ValidateWithLeeway(expected, 0); err != nil {
		return nil, nil, err
	}
	if claims.Subject == "" || claims.IssuedAt == nil || claims.Expiry == nil {
		return nil, nil, errors.New("sub, iat and exp are required")
	}
	if bound && (identity.Htm != method || identity.Htu != target) {
		return nil, nil, errors.New("made for another request")
	}
	return &claims, &identity, nil
}

// docs:end

func reply(w http.ResponseWriter, status int, body any) {
	data, _ := json.Marshal(body)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(data, '\n'))
}

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		assertion := r.Header.Get("X-Tailscale-Identity-Assertion")
		if assertion == "" {
			reply(w, http.StatusUnauthorized, map[string]string{"refused": "no assertion"})
			return
		}
		claims, identity, err := verify(assertion, r.Method, r.RequestURI)
		if err != nil {
			reply(w, http.StatusUnauthorized, map[string]string{"refused": err.Error()})
			return
		}
		token, _ := jwt.ParseSigned(assertion, []jose.SignatureAlgorithm{jose.EdDSA})
		reply(w, http.StatusOK, map[string]any{
			"identity": map[string]any{"sub": claims.Subject, "login": identity.Login, "name": identity.Name,
				"node": identity.Node, "node_id": identity.NodeID, "tags": identity.Tags},
			"kid":       token.Headers[0].KeyID,
			"assertion": assertion,
		})
	})
	if err := http.ListenAndServe(fmt.Sprintf("127.0.0.1:%s", os.Args[1]), nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
