/* Accounts mode (issue 13): the sign-in form, which turns into the
 * register form and back. The server's refusal is shown as text under the
 * password; a notice above the form says why we came back to it (signed
 * out, session expired, banned). What was typed survives every re-render;
 * the password is never kept in the model. */
(function (ChatApp, Backbone) {
  'use strict';

  ChatApp.views.AccountView = Backbone.View.extend({
    className: 'login-screen account-screen',
    template: ChatApp.template('account-template'),

    events: {
      'submit #accountForm': 'submit',
      'click [data-action="switch"]': 'switchForm',
      'input input': 'typed'
    },

    initialize: function (options) {
      this.vent = options.vent;
      this.listenTo(this.model, 'change:error change:busy change:registering change:notice', this.render);
    },

    render: function () {
      var typedName = this.$('#accountName').val();
      var typedPassword = this.$('#accountPassword').val();
      if (typedName !== undefined) {
        this.model.set({ name: typedName }, { silent: true });
      }
      this.$el.html(this.template(this.model.toJSON()));
      // Put back what was typed, but not in the model: the password lives
      // only in the field until it is sent.
      if (typedPassword) {
        this.$('#accountPassword').val(typedPassword);
      }
      this.focus();
      return this;
    },

    shown: function () {
      this.focus();
    },

    focus: function () {
      if (!this.el.isConnected || this.model.get('busy')) {
        return;
      }
      var field = this.$(this.$('#accountName').val() ? '#accountPassword' : '#accountName').get(0);
      if (field) {
        field.focus();
      }
    },

    typed: function () {
      // The refusal was about the old text: stop showing it as invalid.
      this.$('#accountPassword').removeClass('is-invalid');
    },

    switchForm: function () {
      this.model.set({ registering: !this.model.get('registering'), error: '' });
    },

    submit: function (event) {
      event.preventDefault();
      if (this.model.get('busy')) {
        return;
      }
      var name = String(this.$('#accountName').val() || '').trim(); // the server refuses spaces at either end
      var password = String(this.$('#accountPassword').val() || '');
      this.vent.trigger(this.model.get('registering') ? 'register' : 'signIn', name, password);
    }
  });
})(ChatApp, Backbone);
